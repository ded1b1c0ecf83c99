# ddm-node image: one island (or the bootstrap, or the assembler) per container.
#
#   docker build -t ddm-node .                                   # CPU torch (default)
#   docker build -t ddm-node:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#
# Run it like the CLI: `docker run --rm -v ddm-data:/data ddm-node keygen --out /data/key`.
# hivemind 1.1.12 ships its p2pd binary for linux/x86_64 only: build and run for linux/amd64.
FROM python:3.11-slim

# torch is installed first and on its own so `pip install .` finds it satisfied: a bare
# `torch>=2.3` requirement would otherwise resolve to a CUDA build of several GB.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/ddm-node
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY router ./router
COPY ddm_node ./ddm_node
COPY configs ./configs
RUN pip install . && ddm-node --version

# A fixed non-root uid; /data (keys, work dirs) and /shared (plan, announce file, bundle in the
# compose setup) are created here so fresh named volumes inherit this owner. No VOLUME instruction:
# it would give every container without a /data mount (the assembler, `status`, `docker run --rm`)
# an anonymous volume that outlives it; mount a named volume where state must persist.
RUN useradd --create-home --uid 10001 --user-group ddm \
    && mkdir -p /data /shared \
    && chown ddm:ddm /data /shared
USER ddm
WORKDIR /data

# DHT (libp2p, TCP) and gRPC (checkpoint transfer) ports used by docker-compose.yml and docs/DEPLOY.md.
EXPOSE 31337 50051

ENTRYPOINT ["ddm-node"]
CMD ["--help"]
