# The two commands of the README, and the host set-up they share.
.PHONY: setup setup-browser test demo clean-host

PYTHON := .venv/bin/python

setup:
	@bash host/setup.sh

# Chromium + playwright-core for the browser tests (tests/tier4); only `make test` needs them.
setup-browser:
	@bash host/setup_browser.sh

test: setup setup-browser
	@$(PYTHON) -m pytest -q tests

demo: setup
	@$(PYTHON) demo/run_demo.py

clean-host:
	rm -rf .venv .host
