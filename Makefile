# The two commands a newcomer needs (README.md, "Two commands"): `make stack` (install + run the
# whole system live on simulated traffic) and `make test` (install + run every test). Both create
# .venv on first use. tests/integration/test_readme_commands.py runs them as the README writes
# them, from a copy of the checkout.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra `ctrloop stack` flags, e.g. `make stack ARGS='--duration 60'`.
ARGS ?=
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, from the CPU index as the Dockerfile does: on Linux the default
	# index's wheel of the same version pulls gigabytes of CUDA libraries. Only where that index
	# cannot be reached (offline mirrors), the default index; a short timeout and no retries,
	# so an unreachable index costs seconds, not minutes.
	$(BIN)/pip install --quiet --timeout 10 --retries 0 --index-url $(TORCH_CPU_INDEX) $(TORCH) \
	  || { echo "$(TORCH_CPU_INDEX) unreachable: installing $(TORCH) from the default index"; \
	       $(BIN)/pip install --quiet $(TORCH); }
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: install demo stack test lint clean
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ctrloop demo

# The live loop: Kafka + Redis + trainer + service + simulated users; Ctrl-C stops it all.
stack: $(STAMP)
	$(BIN)/ctrloop stack $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
