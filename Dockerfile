# Two targets:
#   docker build --target api -t kma-api .          the API (and `kma migrate`); no model code
#   docker build --target gpu-worker -t kma-worker .   an audit worker with vLLM on CUDA
FROM python:3.11-slim AS source
WORKDIR /srv/kma
COPY pyproject.toml README.md ./
COPY app app
COPY workers workers
COPY kma kma
COPY migrations migrations

FROM python:3.11-slim AS api
WORKDIR /srv/kma
COPY --from=source /srv/kma /srv/kma
RUN pip install --no-cache-dir /srv/kma
EXPOSE 8000
CMD ["kma", "api", "--host", "0.0.0.0", "--port", "8000"]

# vLLM's image brings CUDA, torch and transformers; kma adds itself on top.
FROM vllm/vllm-openai:v0.11.0 AS gpu-worker
WORKDIR /srv/kma
COPY --from=source /srv/kma /srv/kma
RUN pip install --no-cache-dir /srv/kma
ENV HF_HOME=/models
ENTRYPOINT []
# One worker process per GPU: scale the service, one GPU each.
CMD ["kma", "worker"]
