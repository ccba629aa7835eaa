"""The README's example runs as written and its two commands stay the ones CI uses."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    torch = namespace["torch"]
    torch.testing.assert_close(namespace["scores_cg"], namespace["scores"], rtol=1e-5, atol=1e-8)


def test_readme_test_command_is_the_one_ci_runs():
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    lines = ci.splitlines()
    steps = commands[1].split(" && ")
    assert steps[-1] == "python -m pytest" and 'pip install torch==2.13.0 -e ".[test]"' in steps
    assert all(step in lines for step in steps)  # every step of the README's command, verbatim, as a line of CI
    assert commands[0].endswith("python -m benchmarks.run --quick")


def test_the_library_tests_do_not_import_the_benchmarks():
    """tests/attrib_core, tests/attrib_torch and tests/kernels stand on the installed packages alone."""
    import pathlib
    import re

    root = pathlib.Path(__file__).parent
    offenders = [str(path.relative_to(root)) for folder in ("attrib_core", "attrib_torch", "kernels")
                 for path in (root / folder).rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+benchmarks\b", path.read_text(), re.MULTILINE)]
    assert offenders == []
