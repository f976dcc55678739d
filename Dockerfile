# syntax=docker/dockerfile:1.7
# The connbudget operator image: the wheel built in one stage, installed alone in a slim runtime.
#   docker build -t connbudget:0.1.0 .
# The final stage has no compiler, no pip cache and no wheel files; it runs as a numeric non-root
# user and writes nothing to its root filesystem (readOnlyRootFilesystem: true works).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md constraints.txt ./
COPY crds/ crds/
COPY operator/ operator/
# The project's wheel, then every runtime dependency pinned by constraints.txt, as wheels.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip wheel --wheel-dir /wheels --constraint constraints.txt /wheels/connbudget-*.whl

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="connbudget" \
      org.opencontainers.image.description="Kubernetes operator that keeps PostgreSQL inside a connection budget" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/connbudget/connbudget"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Install from the build stage's wheels through a bind mount: they never become a layer here.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "connbudget==${VERSION}"
# 65532 is the conventional "nonroot" UID of distroless images; no home, no shell needed.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["connbudget"]
CMD ["run"]
