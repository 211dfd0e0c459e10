# emu: `make run` runs the demo, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench guests clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/emu demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/speed.py

# Rebuild the guest ELFs (committed, so tests need no compiler).
guests:
	@command -v clang-14 >/dev/null && command -v ld.lld-14 >/dev/null && command -v s390x-linux-gnu-ld >/dev/null \
	  || (apt-get update -q && apt-get install -y -q clang-14 lld-14 binutils-s390x-linux-gnu qemu-user)
	$(MAKE) -C workloads
	$(MAKE) -C workloads check

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
