VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

# Re-install only when the package definition changes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mpcompile formats
	$(PY) examples/demo.py

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/arith.py
	$(PY) benchmarks/compile.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache
