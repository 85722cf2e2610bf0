# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make run    create .venv, install requirements.txt, run FedAvg + SimCLR on the bundled Fashion-MNIST
#   make test   create .venv, install requirements.txt, run the test suite
# (plain Make + venv + pip: nothing to install by hand, and the same pip that CI uses.)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: run test compare benchmark clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

run: $(BIN)/.installed
	$(BIN)/python fedavg_cl.py

test: $(BIN)/.installed
	$(BIN)/python -m pytest tests -q

compare: $(BIN)/.installed
	$(BIN)/python compare.py --quick

benchmark: $(BIN)/.installed
	$(BIN)/python benchmark.py

clean:
	rm -rf $(VENV) runs
