# The two commands of the README, and the host set-up they share.
#
# By default both run on the development host that `make setup` builds (.venv/ and a
# ComfyUI 0.3.75 tree in .host/ComfyUI). With COMFYUI set, they run on that ComfyUI
# install instead, with PYTHON (default: python3 on PATH) as its Python environment:
#     make test COMFYUI=/path/to/ComfyUI PYTHON=/path/to/ComfyUI/venv/bin/python
# (host/external.sh: the tree and the environment are not written to).
.PHONY: setup setup-browser test demo clean-host

COMFYUI ?=

ifeq ($(strip $(COMFYUI)),)
PYTHON := .venv/bin/python
# The suite runs on this many pytest-xdist workers, one CPU thread each (tests/conftest.py):
# "auto" is one per core, at most 4; 0 runs it in this process. Each worker boots its own
# ComfyUI; a test module's tests stay on one worker (its fixtures are built once).
TEST_WORKERS ?= auto

test: setup setup-browser
	@$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadscope tests

demo: setup
	@$(PYTHON) demo/run_demo.py
else
# PYTHON only when given on the command line or in the environment
EXTERNAL_PYTHON := $(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),python3)

test: setup-browser
	@COMFYUI="$(COMFYUI)" PYTHON="$(EXTERNAL_PYTHON)" bash host/external.sh test

demo:
	@COMFYUI="$(COMFYUI)" PYTHON="$(EXTERNAL_PYTHON)" bash host/external.sh demo
endif

setup:
	@bash host/setup.sh

# Chromium + playwright-core for the browser tests (tests/tier4); only `make test` needs them.
setup-browser:
	@bash host/setup_browser.sh

clean-host:
	rm -rf .venv .host
