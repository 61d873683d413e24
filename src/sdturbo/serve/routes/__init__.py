"""One router per API surface: openai.py, a1111.py, ws.py, health.py, page.py."""
