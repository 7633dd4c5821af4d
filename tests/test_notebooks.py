"""Every notebook in colab/ runs top to bottom (shrunk), so none can silently rot.

Each notebook is executed with nbclient in a fresh IPython kernel running this
interpreter (a kernelspec written to a temporary directory put on JUPYTER_PATH, so
neither an installed `python3` kernelspec nor PATH can pick another Python), with
this checkout first on PYTHONPATH. A cell is injected after the one tagged
`parameters`: it shrinks the step counts and model sizes (the names in `SHRUNK`
that the parameters cell assigns), sends every `*_DIR` parameter to `tmp_path`
(`DATA_DIR`: one demo/digits data directory, built once for all notebooks) and
leaves the other parameters alone. A cell tagged `internet` (02_distillation's
download and conversion of the official MAE ViT-Base) is not run: the test puts a
line saying so in its place and warns that it skipped it. A failing cell fails the
test with its source and traceback; the executed notebook is kept in `tmp_path`
for inspection.

The kernel does *not* get conftest's 8 fake CPU devices: the notebooks run as on a
Colab CPU runtime (one device); sharding is tested elsewhere. The notebooks share a
JAX persistent compilation cache (a session temporary directory), so the programs
they have in common (the shrunk MAE step, the reconstruction, the probe) compile once.
"""

import ast
import glob
import json
import os
import re
import sys
import warnings

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
KERNEL_NAME = "mim_jax_test_python"
CELL_TIMEOUT_S = 900

# Test values of the parameters the notebooks share; a notebook parameter not listed
# here (and not a *_DIR) keeps its value. Every MAE run is the same small ViT (the
# distillation notebook's MAE student too: the student size equals the teacher's) so
# that its compiled step comes from the compilation cache after the first notebook.
SHRUNK = {
    "TOTAL_STEPS": 4,
    "LOG_EVERY": 2,
    "IMAGE_EVERY": 2,
    "BATCH_SIZE": 16,
    "WORKER_COUNT": 0,  # in-process data loading: no worker start-up per run
    "WIDTH": 32,
    "DEPTH": 2,
    "NUM_HEADS": 4,
    "DECODER": {"width": 16, "depth": 1, "num_heads": 2},
    "STUDENT_WIDTH": 32,
    "STUDENT_HEADS": 4,
}
# Cells that must leave a PNG among their outputs: pyplot's show, or displaying an image
# (03_analysis's `show(name)` helper displays the PNG a plot wrote).
SHOWS_PLOT = re.compile(r"plt\.show\(\)|^\s*show\(|display\(Image\(", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Cells that download (they need internet and minutes): skipped, with a warning saying so.
INTERNET_TAG = "internet"
# Packages of optional extras (`torch`): a notebook importing one is skipped without it.
OPTIONAL = ("torch", "timm", "safetensors")
OPTIONAL_IMPORT = re.compile(rf"^\s*(?:import|from)\s+({'|'.join(OPTIONAL)})\b", re.MULTILINE)


def executed_source(source: str) -> str:
  """The cell's source minus function definitions (a `def show(...)` shows nothing)."""
  lines = source.splitlines()
  try:
    tree = ast.parse(source.replace("%pip", "#pip"))
  except SyntaxError:
    return source
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      for i in range(node.lineno - 1, node.end_lineno):
        lines[i] = ""
  return "\n".join(lines)


def test_there_are_notebooks():
  names = [os.path.basename(path) for path in NOTEBOOKS]
  for expected in ("01_quickstart.ipynb", "02_distillation.ipynb", "03_analysis.ipynb",
                   "04_export.ipynb"):
    assert expected in names


def parameters_cell(nb) -> int:
  found = [i for i, cell in enumerate(nb.cells)
           if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])]
  assert len(found) == 1, "a notebook needs exactly one code cell tagged 'parameters'"
  return found[0]


def assigned_names(source: str) -> list[str]:
  names = []
  for node in ast.parse(source).body:
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, ast.AnnAssign) else [])
    for target in targets:
      for leaf in ast.walk(target):
        if isinstance(leaf, ast.Name):
          names.append(leaf.id)
  return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_clean(path):
  """No stored outputs; the Colab install cell first; a parameters cell."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
  for cell in code_cells:
    assert not cell.outputs and cell.execution_count is None, (
        f"stored outputs in {cell.source[:60]!r}: clear them before committing")
  assert "google.colab" in code_cells[0].source and "%pip install" in code_cells[0].source
  assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
  source = nb.cells[parameters_cell(nb)].source
  assert all(isinstance(node, (ast.Assign, ast.AnnAssign)) for node in ast.parse(source).body), (
      "the parameters cell holds plain assignments only (the test overrides them after it)")
  assert any(name.endswith("DIR") for name in assigned_names(source)), (
      "outputs must go to a *_DIR parameter")
  for cell in code_cells:  # skipped by the test: each must skip itself when offline too
    if INTERNET_TAG in cell.metadata.get("tags", []):
      assert "urlopen" in cell.source, "a cell tagged 'internet' checks it can reach its URL"


@pytest.fixture(scope="session", name="kernel_setup")
def kernel_setup_fixture(tmp_path_factory):
  """A kernelspec running this interpreter, the kernel's environment, the shared data dir."""
  root = tmp_path_factory.mktemp("notebook_kernel")
  spec_dir = root / "jupyter" / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "mim_jax tests", "language": "python"}))
  env = dict(os.environ)
  # Not conftest's fake devices: one CPU device, as a Colab CPU runtime has.
  flags = [flag for flag in env.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  # This checkout's mim_jax, whatever is installed.
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return {"jupyter_path": str(root / "jupyter"), "env": env, "data_dir": str(root / "tfds")}


def injected_source(names: list[str], tmp_path, data_dir: str) -> str:
  values = {}
  for name in names:
    if name == "DATA_DIR":
      values[name] = data_dir
    elif name.endswith("DIR"):
      values[name] = str(tmp_path / name.lower())
    elif name in SHRUNK:
      values[name] = SHRUNK[name]
  lines = ["# Injected by tests/test_notebooks.py: a small, fast run under tmp_path."]
  lines += [f"{name} = {value!r}" for name, value in values.items()]
  return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, kernel_setup, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      for module in OPTIONAL_IMPORT.findall(cell.source):
        pytest.importorskip(module, reason=f"the notebook needs {module} (the torch extra)")
  index = parameters_cell(nb)
  names = assigned_names(nb.cells[index].source)
  injected = nbformat.v4.new_code_cell(
      injected_source(names, tmp_path, kernel_setup["data_dir"]),
      metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(index + 1, injected)
  for cell in nb.cells:
    if INTERNET_TAG in cell.metadata.get("tags", []):
      cell.source = "print('Skipped by tests/test_notebooks.py: this cell needs internet')"
      warnings.warn(f"{os.path.basename(path)}: skipped the cell tagged {INTERNET_TAG!r} "
                    f"(it downloads; the test runs offline)")

  # Where the client's kernel manager (created, and shut down, by nbclient) finds the spec.
  monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
      [kernel_setup["jupyter_path"]] + [p for p in [os.environ.get("JUPYTER_PATH")] if p]))
  client = nbclient.NotebookClient(
      nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, startup_timeout=180,
      resources={"metadata": {"path": str(tmp_path)}})  # the kernel's working directory
  executed = tmp_path / f"executed_{os.path.basename(path)}"
  try:
    client.execute(env=kernel_setup["env"])
  except nbclient.exceptions.CellExecutionError as error:
    pytest.fail(f"{os.path.basename(path)} failed (executed copy: {executed}):\n"
                f"{ANSI.sub('', str(error))}", pytrace=False)
  finally:
    nbformat.write(nb, str(executed))
  # A plot that silently disappears (e.g. a library switched matplotlib's backend with
  # matplotlib.use, or a bare Figure displayed as text) is a failure too.
  for cell in nb.cells:
    if cell.cell_type == "code" and SHOWS_PLOT.search(executed_source(cell.source)):
      if not any("image/png" in out.get("data", {}) for out in cell.outputs):
        pytest.fail(f"{os.path.basename(path)}: this cell showed no plot (was matplotlib's "
                    f"backend switched away from inline?):\n{cell.source}", pytrace=False)
