"""Set-up files agree with each other: environment.yml lists what pyproject.toml lists; CI runs the README's command."""
from __future__ import annotations

import re
import tomllib

import yaml

from conftest import ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r.replace(" ", "") for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-e")}
    assert listed == wanted
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    assert [ln for ln in ci.splitlines() if ln and not ln.startswith("#") and not ln.startswith("set ")
            and not ln.startswith("cd ")] == ["exec bash scripts/test.sh"]
    # the two commands open the README
    head = readme.split("\n## ", 1)[0]
    assert "bash scripts/demo.sh" in head and "bash scripts/test.sh" in head


def test_no_ui_imports_at_engine_module_level():
    """The engine stays importable without UI libraries: streamlit never, ipywidgets only in workbench/notebook/,
    plotly only in the figure builders and the notebook views."""
    for path in (ROOT / "workbench").rglob("*.py"):
        rel = path.relative_to(ROOT / "workbench").as_posix()
        allowed = set()
        if rel.startswith("notebook/"):
            allowed = {"ipywidgets", "plotly"}
        elif rel == "figures.py":
            allowed = {"plotly"}
        for line in path.read_text().splitlines():
            m = re.match(r"^(?:import|from) (streamlit|ipywidgets|plotly)\b", line)
            assert not m or m.group(1) in allowed, f"{rel}: {line}"


def test_engine_imports_without_ui_libraries():
    import subprocess
    import sys

    code = ("import sys; sys.modules['streamlit'] = None; sys.modules['ipywidgets'] = None; "
            "sys.modules['plotly'] = None; import workbench, workbench.runview, workbench.cli, workbench.scenarios")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
