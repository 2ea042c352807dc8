"""The notebooks run top to bottom and show what they promise.

Each notebook executes in a fresh kernel of this interpreter (a kernelspec
written for the test, so no user-level "python3" spec can send it to another
Python), in a temporary working directory (its runs/ output lands there),
with XLA_FLAGS cleared so the notebook's own set-up cell must provide the 8
emulated devices.
"""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "python3"
CELL_TIMEOUT_S = 600  # the 2-core CI machine may be busy; each notebook takes a minute or two


def _kernelspec(root: Path) -> Path:
    """A kernelspec named KERNEL that starts ipykernel with this interpreter; returns its JUPYTER_PATH."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test interpreter)",
        "language": "python",
    }))
    return root


def _text(cell) -> str:
    """Everything a code cell printed (stdout and stderr streams, and text results)."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _execute(name: str, tmp_path_factory, **extra_env):
    """(the notebook after a run, everything its code cells printed, its working directory);
    `extra_env`: environment variables for its kernel."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    probe = nbformat.v4.new_code_cell("import sys; print('kernel executable:', sys.executable)")
    nb.cells.append(probe)

    workdir = tmp_path_factory.mktemp(name.split(".")[0])
    jupyter_path = _kernelspec(tmp_path_factory.mktemp("jupyter"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra_env)
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(jupyter_path), env.get("JUPYTER_PATH")]))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # read by the kernelspec lookup in this process
    try:
        client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                                resources={"metadata": {"path": str(workdir)}})
        try:
            client.execute(env=env)
        except CellExecutionError as err:
            pytest.fail(f"the notebook raised in a cell:\n{err}")
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
    outputs = "\n".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
    return nb, outputs, workdir


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    return _execute("quickstart.ipynb", tmp_path_factory)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    return _execute("finetune.ipynb", tmp_path_factory)


def test_notebook_kernel_is_this_interpreter(executed):
    _, outputs, _ = executed
    assert f"kernel executable: {sys.executable}" in outputs


def test_notebook_sets_up_eight_cpu_devices_and_shards_with_fsdp_tp(executed):
    _, outputs, _ = executed
    assert "8 cpu devices" in outputs
    assert "layout fsdp_tp" in outputs
    assert "P(None, 'fsdp', 'tensor', None)" in outputs  # wq's embed split on fsdp, heads on tensor
    share = float(re.search(r"device 0 holds [\d,]+ of [\d,]+ parameter bytes \(([\d.]+)%\)", outputs)[1])
    assert share < 50, "device 0 should hold a fraction of the parameters"


def test_notebook_training_memorises_the_sentences(executed):
    _, outputs, workdir = executed
    final = float(re.search(r"final loss: ([\d.]+) at step 40", outputs)[1])
    assert final < 0.5
    losses = [json.loads(line)["loss"] for line in
              (workdir / "runs" / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] > 4 * losses[-1], f"loss should fall: {losses}"
    assert "image/png" in json.dumps([cell.get("outputs") for cell in executed[0].cells]), "no loss plot"


def test_notebook_generates_the_memorised_text_before_and_after_reload(executed):
    _, outputs, workdir = executed
    assert "'A mesh names' -> ' the devices; a layout maps logical axes onto the mesh.'" in outputs
    assert "same text after reload: True" in outputs
    assert (workdir / "runs" / "quickstart" / "checkpoints" / "40").is_dir()


def test_finetune_notebook_teaches_the_answer_form_and_its_exports_give_our_logits(finetuned):
    _, outputs, workdir = finetuned
    assert f"kernel executable: {sys.executable}" in outputs
    assert "40 chats" in outputs and "wrote runs/finetune/base (step 0, 2 layers, float32)" in outputs
    rows = [json.loads(line) for line in
            (workdir / "runs" / "finetune" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    assert all("eval_loss" in rows[i] for i in (1, 3, 5))
    trained, frozen = map(lambda s: int(s.replace(",", "")), re.search(
        r"trained ([\d,]+) adapter parameters over a frozen base of ([\d,]+)", outputs).groups())
    assert trained < 0.25 * frozen
    # train.eval printed the run's last held-out figures
    printed = json.loads(re.search(r'^\{.*"eval_loss".*\}$', outputs, re.M)[0])
    assert abs(printed["eval_loss"] - rows[-1]["eval_loss"]) <= 1e-5 * rows[-1]["eval_loss"]
    answers = re.findall(r"^(before|after) +'What is the capital of (?:France|Atlantis)\?' -> '(.*)'$",
                         outputs, re.M)
    assert [when for when, _ in answers] == ["before", "before", "after", "after"], answers
    for when, text in answers:  # the trained form, for a known and an unseen country, and only after
        assert (text.startswith("The capital of ") and text.endswith(".")) == (when == "after"), answers
    differences = re.findall(r"largest logit difference from ours ([\d.e+-]+)", outputs)
    assert len(differences) == 2 and all(float(d) < 1e-4 for d in differences), differences


@pytest.fixture(scope="module")
def layouts_executed(tmp_path_factory):
    """notebooks/layouts.ipynb run with the tiny model on v5p:2x2x2 (compile-only devices)."""
    pytest.importorskip("libtpu", reason="the layouts notebook compiles for TPU: pip install -e '.[tpu]'")
    return _execute("layouts.ipynb", tmp_path_factory, LAYOUTS_NOTEBOOK_SMALL="1")


def test_layouts_notebook_shows_each_layouts_traffic_table_and_chart(layouts_executed):
    nb, outputs, workdir = layouts_executed
    header = next(line for line in outputs.splitlines() if line.startswith("layout "))
    assert "AR data" in header and "AG fsdp" in header and "est. step s" in header, header
    rows = {line.split()[0]: line for line in outputs.splitlines()
            if line.split()[:1] in (["dp"], ["fsdp"], ["fsdp_tp"])}
    assert set(rows) == {"dp", "fsdp", "fsdp_tp"} and all(" fits " in r for r in rows.values()), rows
    assert (workdir / "layouts_tiny_cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert "image/png" in json.dumps([cell.get("outputs") for cell in nb.cells])
    assert re.search(r"all-gather\s+over fsdp\s+x2 ", outputs), "per-layer gathers run once per layer"
    assert "estimate: {'compute_s'" in outputs
