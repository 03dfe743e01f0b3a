FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY riverflow riverflow
COPY streams streams
COPY features features
COPY models models
COPY monitors monitors
COPY examples examples
RUN pip install --no-cache-dir -e .
USER nobody
CMD ["riverflow", "--help"]
