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
    install = 'pip install --quiet torch==2.13.0 -e ".[test]"'
    assert install.replace("--quiet ", "") in commands[1] and install in ci
    assert commands[1].endswith("python -m pytest") and "\npython -m pytest\n" in ci
    assert commands[0].endswith("python -m benchmarks.run --quick")
