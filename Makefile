PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Paddle's bundled MKL takes a slow path on AMD unless told; set before paddle is imported.
export OMP_NUM_THREADS ?= 2
export MKL_DEBUG_CPU_TYPE ?= 5
# torch and paddle in one process (parity, tests): idle OpenMP threads sleep instead of spinning
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv test parity demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests

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
	$(VPY) -m bench.bench --allocator both --out bench/results.json

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
