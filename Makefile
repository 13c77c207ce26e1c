# The README's two commands:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV ?= .venv
DEMO_DIR ?= .demo
BIN = $(VENV)/bin
export CROSSMODAL_INDEX_DIR ?= $(abspath $(DEMO_DIR)/index)

.PHONY: install demo test clean

# torch/torchvision come first and pinned: they install from local disk on our machines,
# and an unpinned resolver would fetch a newer multi-GB build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e .
	touch $@

# The tests add their tools and Ray (the distributed-embedding tests start a Ray cluster).
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Index the sample collection, show one search each way, then bring up the search service
# and the web UI on it; the URL to open is printed (Ctrl-C stops both).
demo: install
	$(BIN)/crossmodal demo-data $(DEMO_DIR)/collection
	$(BIN)/crossmodal index $(DEMO_DIR)/collection
	$(BIN)/crossmodal search "a man with a camera" -k 3
	$(BIN)/crossmodal search --image $(DEMO_DIR)/collection/horse.png -k 3
	$(BIN)/crossmodal up

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
