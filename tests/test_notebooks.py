"""Executes every notebook in notebooks/ top to bottom on CPU (nbclient + ipykernel).

Each notebook writes its files under $JAXALIGN_NOTEBOOK_OUT (a pytest tmp dir here) and must finish
within NOTEBOOK_TIMEOUT seconds; a cell that raises fails the test with the cell's traceback.
"""

import glob
import os
import signal

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
NOTEBOOK_TIMEOUT = 420  # seconds per notebook (each takes well under a minute on an idle 2-core CPU)
EXPECTED = {"losses", "lora_qlora", "alignment_tax", "spectral", "learning_dynamics"}


def test_every_area_has_a_notebook():
    names = {os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS}
    assert EXPECTED <= names, f"missing notebooks: {sorted(EXPECTED - names)}"


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXALIGN_NOTEBOOK_OUT", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=NOTEBOOK_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": REPO}})
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(NOTEBOOK_TIMEOUT)
    try:
        client.execute()
    except _Timeout:
        pytest.fail(f"{os.path.basename(path)} did not finish within {NOTEBOOK_TIMEOUT} s")
    except CellExecutionError as e:
        pytest.fail(f"{os.path.basename(path)} failed:\n{str(e)[-4000:]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{os.path.basename(path)} displayed no figure"
    assert any(name.endswith(".png") for name in os.listdir(tmp_path)), "no figure written to the out dir"
