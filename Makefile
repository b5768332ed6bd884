VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

# Re-install only when the package definition changes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mpcompile formats
	$(VENV)/bin/mpcompile inspect lenet5 --policy policies/hfp8.yaml --input-shape 1,1,8,8 --calibrate

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/arith.py
	$(PY) benchmarks/compile.py

clean:
	rm -rf $(VENV) .pytest_cache
