# The two commands of the README. Each builds .venv when it is missing or stale.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of PyTorch, installed before anything can ask for `torch`.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test demo core-demo bench lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[torch,dev]"
	# torchattacks (the reference our PGD is tested against) requires torchvision, which
	# would replace the CPU torch with a CUDA build; it imports fine without it.
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

test: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/gdws demo

core-demo: venv
	$(PY) -m gdws_approx.demo

bench: venv
	$(PY) bench/fit_speed.py
	$(PY) bench/alpha_speed.py
	$(PY) bench/pgd_speed.py

lint: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache build *.egg-info
