import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    # The two fresh-machine commands are the README's only ```bash blocks (other examples use ```sh).
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 2
    demo, tests = blocks
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("mdland demo")
    assert "pip install torch==2.13.0" in demo and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
