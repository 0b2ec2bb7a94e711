# The two commands a newcomer needs: `make demo` (install + run the learning loop on simulated
# traffic) and `make test` (install + run every test). Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: any other spec pulls gigabytes of CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: install demo stack test lint clean
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ctrloop demo

# The live loop: Kafka + Redis + trainer + service + simulated users; Ctrl-C stops it all.
stack: $(STAMP)
	$(BIN)/ctrloop stack

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
