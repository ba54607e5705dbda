"""The TensorBoard tab: the command that opens the run's logs, and a TensorBoard server this app starts on
127.0.0.1 for it."""
from __future__ import annotations

import streamlit as st

from . import tb
from .ui import attempt, show_flash


def cb_tb(run_key: str, start: bool) -> None:
    attempt("tensorboard", tb.start if start else tb.stop, run_key)


def tensorboard_ui(run_key: str | None) -> None:
    if not run_key:
        st.info("Select a run.")
        return
    st.markdown("Open this run's TensorBoard logs with:")
    st.code(tb.command(run_key), language="bash")
    if not tb.available():
        st.info("TensorBoard is not installed in this environment.")
        return
    url = tb.running(run_key)
    if url:
        st.markdown(f"TensorBoard runs at [{url}]({url}) (it takes a few seconds to come up).")
        st.button("Stop TensorBoard", key="tb_stop", on_click=cb_tb, args=(run_key, False))
    else:
        st.button("Start TensorBoard on 127.0.0.1", key="tb_start", on_click=cb_tb, args=(run_key, True))
    show_flash("tensorboard")
