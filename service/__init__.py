"""The scoring service: FastAPI app (service/app.py), hot-reloading model holder
(service/reloader.py), scorer (service/scoring.py), Kafka event sink (service/sink.py)."""
