"""Batch jobs: `python -m minserve run-batch` and the online OpenAI Batch API (/v1/files,
/v1/batches). lines (the JSONL line format: input envelopes, output lines) -> runner (each line
through the app's own route handlers, in-process, at batch priority) -> store (SQLite in WAL mode
plus a files folder: uploads, per-line results, batch state) -> service (runs, resumes after a
restart, cancels and finalizes batches) -> routes (the HTTP handlers, multipart uploads via
multipart.py). offline.py is the run-batch command. Nothing here imports torch."""
