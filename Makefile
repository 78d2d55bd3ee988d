# The two commands of README.md:
#   make search   set up, then run the main job (python -m csext search --out runs/mnist1d-mlp;
#                 OUT=DIR writes elsewhere, ARGS="--epochs 5" adds options)
#   make test     set up, install the test dependencies, then run the test suite
# They install into the Python that `python` is: create and activate a venv first to keep them
# apart from the rest, or name another with `make PYTHON=/path/to/python ...`. Each set-up step
# runs again only when what it depends on changed; its stamp is kept under .setup/.

PYTHON ?= python
PIP := $(PYTHON) -m pip
TORCH ?= torch==2.13.0
DEPS := 'setuptools>=64' wheel ninja numpy tqdm mnist1d
TEST_DEPS := pytest expecttest matplotlib transformers triton onnx onnxruntime onnxscript
OUT ?= runs/mnist1d-mlp
ARGS ?=
SEARCH := $(PYTHON) -m csext search --out $(OUT)$(if $(ARGS), $(ARGS))

# An id of the Python environment (stamps are kept per environment: each has its own install),
# whether csext is installed there in place from this checkout (another checkout's install maps
# csext.kernels elsewhere), its scripts folder, and torch's __init__.py (newer once torch is
# reinstalled).
ENV_INFO := $(shell $(PYTHON) -c "import hashlib, json, pathlib, sys, sysconfig, importlib.metadata as m, importlib.util as u; \
  d = next(iter(m.distributions(name='csext')), None); url = json.loads((d and d.read_text('direct_url.json')) or '{}'); \
  here = url.get('url') == pathlib.Path.cwd().as_uri() and url.get('dir_info', {}).get('editable'); \
  t = u.find_spec('torch'); \
  print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12], 'here' if here else 'elsewhere', \
        sysconfig.get_path('scripts'), t.origin if t else '')" 2>/dev/null)
ifeq ($(ENV_INFO),)
$(error cannot run `$(PYTHON)`: activate a venv of Python 3.10 or newer, or name one with make PYTHON=/path/to/python)
endif
STAMPS := .setup/$(word 1,$(ENV_INFO))
# The pytest script, as `pytest` would run: `python -m pytest` would put the checkout on sys.path,
# where its top-level kernels/ passes for the PyPI package `kernels` that transformers looks for.
PYTEST := $(word 3,$(ENV_INFO))/pytest
TORCH_FILE := $(word 4,$(ENV_INFO))
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)
# Build again where the in-place install or its build record is missing, or another
# environment rebuilt the extension since (its record is then newer than this stamp).
REBUILD := $(if $(filter here,$(word 2,$(ENV_INFO))),$(or $(wildcard csext/_build.json),FORCE),FORCE)

.PHONY: search test setup FORCE

search: setup
	@echo "search: $(SEARCH) (about 30 seconds on 2 cores)"
	@$(SEARCH)

test: setup $(STAMPS)/test-deps
	@echo "test: CSEXT_REQUIRE_EXTENSION=1 $(PYTEST) -q tests (about 5 minutes on 2 cores)"
	@CSEXT_REQUIRE_EXTENSION=1 $(PYTEST) -q tests

setup: $(STAMPS)/build

$(STAMPS)/deps: Makefile
	@mkdir -p $(STAMPS)
	@prefix=$$($(PYTHON) -c "import sys; print(sys.prefix)"); \
	version=$$($(PYTHON) -c "import torch; print(torch.__version__)" 2>/dev/null); \
	if [ -n "$$version" ]; then \
	  echo "setup: keeping torch $$version, installed in $$prefix"; \
	else \
	  echo "setup: pip install $(TORCH) into $$prefix (install your own torch first for another build)"; \
	  $(PIP) install -q $(TORCH); \
	fi
	@echo "setup: pip install $(DEPS)"
	@$(PIP) install -q $(DEPS)
	@touch $@

$(STAMPS)/build: $(SOURCES) $(TORCH_FILE) $(REBUILD) | $(STAMPS)/deps
	@echo "setup: building csext._C, the C++ extension, in place (pip install --no-build-isolation -e .): this takes a minute or two"
	@$(PIP) install -q --no-build-isolation -e .
	@touch $@

$(STAMPS)/test-deps: Makefile | $(STAMPS)/deps
	@echo "setup: pip install $(TEST_DEPS) (the test dependencies)"
	@$(PIP) install -q $(TEST_DEPS)
	@touch $@

FORCE:
