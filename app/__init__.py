"""The Training Workbench dashboard (Streamlit): ``streamlit run app/dashboard.py -- --runs ROOT``.

``dashboard.py`` is the page; the helper modules hold everything that does not draw (run sources,
actions, the live view's data+figures, comparisons, TensorBoard processes), so tests and the benchmark
call them without a browser. Nothing here trains: it all goes through the engine's public API.
"""
