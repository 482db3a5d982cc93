# Stillpoint: `make demo` runs a real backup and restore on the lab; `make test` runs the tests.
PY := .venv/bin/python
.PHONY: deps test demo bench lint clean soak consistency appliance-test

deps:
	@./scripts/install-deps.sh

test: deps
	$(PY) -m pytest -q --durations=25 tests --ignore=tests/appliance

# The appliance image: a real packer build under QEMU (tens of minutes under TCG, cached by
# its inputs), booted and checked (tests/appliance, docs/appliance-image.md).
appliance-test: deps
	$(PY) -m pytest -q -o timeout=7200 tests/appliance

soak: deps
	STILLPOINT_SOAK_CYCLES=$${STILLPOINT_SOAK_CYCLES:-20} $(PY) -m pytest -q -o timeout=7200 tests/faults/test_soak.py

demo: deps
	$(PY) -m stillpoint_lab.demo

# docs/consistency.md: crash / quiesce / agent restore points under load, each one booted.
consistency: deps
	$(PY) -m stillpoint_lab.consistency --points $${POINTS:-10} --out docs/consistency.md

bench: deps
	$(PY) -m bench.run

# Fails on any finding; .ci/run runs it before the tests.
lint: deps
	$(PY) -m ruff check appliance stillpoint_lab tests bench agent_payload
	$(PY) -m mypy appliance stillpoint_lab

clean:
	rm -rf .venv build *.egg-info
