"""What `pip install st3` gives: the library needs only torch and transformers; the command line its extra;
its wheel holds the library alone (the scenes benchmark, trainer and checkpoint are `scenes/`'s)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

#: The `cli` extra's packages that transformers does not pull in itself.
CLI_ONLY = ("typer", "rich", "matplotlib", "accelerate", "PIL")


def run_without_cli_extra(code: str) -> subprocess.CompletedProcess:
    blocked = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in CLI_ONLY)
    return subprocess.run([sys.executable, "-c", blocked + code], capture_output=True, text=True, timeout=300)


def test_the_library_applies_a_method_without_the_cli_extra():
    done = run_without_cli_extra(
        "import st3\n"
        "from st3.testing import tiny_inputs, tiny_llava\n"
        "model = tiny_llava(attn='sdpa')\n"
        "inputs = tiny_inputs(model, ((2, 3),))\n"
        "method = st3.ST3(start_layer=1, stride=1)\n"
        "with method(model):\n"
        "    model.generate(**inputs, max_new_tokens=3, eos_token_id=None)\n"
        "print(method.trace.visual_per_layer[-1] < method.trace.visual_per_layer[0], st3.match('fastv', 192).ratio)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "True"


def test_the_command_says_which_extra_it_needs():
    done = run_without_cli_extra("import st3.cli")
    assert done.returncode != 0
    assert "pip install 'st3[cli]'" in done.stderr and "typer" in done.stderr


def test_the_wheel_holds_no_trainer_and_no_checkpoint(tmp_path):
    """`pip wheel .` of the repository packs `st3` only; the scenes package stays out of it."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", "runs")
    shutil.copytree(Path(__file__).resolve().parents[2], source, ignore=ignore)
    assert (source / "scenes" / "st3_scenes" / "train.py").is_file()  # there to leak, were the config wrong
    out = tmp_path / "wheel"
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
    done = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    [wheel] = out.glob("st3-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"st3/__init__.py", "st3/methods/st3.py", "st3/cli.py", "st3/testing.py"} <= set(names)
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"st3"}
    leaked = [name for name in names if name.endswith((".safetensors", "train.py")) or "/assets/" in name]
    assert leaked == []
