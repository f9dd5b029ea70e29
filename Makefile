PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Per-machine settings (threads; MKL's code path on AMD CPUs only), decided by paddle_impl/machine.py for THIS
# machine (`$(VPY) -m paddle_impl.machine` says what and why); variables already set by the user win. Every
# Python entry point also applies them itself when it imports paddle_impl; this passes them to all processes.
MACHINE_ENV := $(shell test -x $(VPY) && $(VPY) -m paddle_impl.machine --make 2>/dev/null)
$(foreach kv,$(MACHINE_ENV),$(eval export $(kv)))
# torch and paddle in one process (tests, parity): idle OpenMP threads sleep instead of spinning; the demo too
# (its data-loading worker processes share the 2 cores). Not for bench: its workers get each setting they are
# measured under (bench/bench.py).
test parity demo parity-official: export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv test parity demo bench bench-avx2 bench-intel-mkl clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

# two pytest workers (pytest-xdist), one test file per worker at a time: module fixtures stay in one process;
# measured on the 2-core VM: 698 s with one process, 470 s with two (docs/benchmarks.md "Test suite")
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

parity: $(STAMP)
	mkdir -p out
	$(VPY) -m parity --arch all --dtype float64 --json out/parity_float64.json
	$(VPY) -m parity --arch all --dtype float32 --json out/parity_float32.json --no-init
	$(VPY) -m parity --arch resnet50 --steps 10 --optimizer lars --dtype both --json out/parity_steps_lars.json
	$(VPY) -m parity --arch vit_small --steps 10 --optimizer adamw --dtype both --json out/parity_steps_adamw.json
	$(VPY) -m parity.summary out/parity_float64.json out/parity_float32.json out/parity_steps_lars.json out/parity_steps_adamw.json

demo: $(STAMP)
	$(VPY) demo/run_demo.py --out demo_out

bench: $(STAMP)
	$(VPY) -m bench.bench --allocator both --wait-policy both --out bench/results.json

# the same items with both frameworks capped at AVX2/FMA (MKL, oneDNN, ATen, our kernels): an AVX2 machine's
# code paths, measured on a wider CPU
bench-avx2: $(STAMP)
	$(VPY) -m bench.bench --isa avx2 --allocator both --wait-policy both --no-inference --out bench/results_avx2.json

# the same items with both frameworks' MKL on the code paths it takes on an Intel CPU (bench/mkl_path.py): on an
# AMD CPU torch's MKL otherwise runs its slow non-Intel path, which flatters Paddle; this is the Intel proxy
bench-intel-mkl: $(STAMP)
	$(VPY) -m bench.bench --mkl-path intel --allocator both --wait-policy both --no-inference --out bench/results_intel_mkl.json

clean:
	rm -rf $(VENV)

# The float64 proof against the ORIGINAL facebookresearch/moco-v3 code (not in this repository):
#   git clone https://github.com/facebookresearch/moco-v3 DIR; pip install --target TIMMDIR timm==0.4.9
#   make parity-official OFFICIAL=DIR TIMM=TIMMDIR
.PHONY: parity-official
parity-official: $(STAMP)
	@test -n "$(OFFICIAL)" || { echo "error: pass OFFICIAL=DIR (a checkout of facebookresearch/moco-v3) and TIMM=DIR (pip install --target DIR timm==0.4.9)"; exit 2; }
	mkdir -p out
	$(VPY) -m parity --reference official --official-src $(OFFICIAL) --timm-src $(TIMM) --arch vit_small --batch 4 --json out/official_vit_small.json
	$(VPY) -m parity --reference official --official-src $(OFFICIAL) --timm-src $(TIMM) --arch resnet50 --batch 4 --json out/official_resnet50.json
	$(VPY) -m parity --reference official --official-src $(OFFICIAL) --timm-src $(TIMM) --arch vit_small --depth 4 --steps 10 --json out/official_steps_vit_small.json
	$(VPY) -m parity --reference official --official-src $(OFFICIAL) --timm-src $(TIMM) --arch resnet50 --steps 10 --json out/official_steps_resnet50.json
	$(VPY) -m parity --reference official --official-src $(OFFICIAL) --timm-src $(TIMM) --arch vit_small --depth 2 --trace --json out/official_trace.json
	$(VPY) -m parity.summary out/official_vit_small.json out/official_resnet50.json out/official_steps_vit_small.json out/official_steps_resnet50.json
