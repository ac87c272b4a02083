-- wrk script: POST /generate with a one-token request (measures the serving layer, not the model).
wrk.method = "POST"
wrk.path = "/generate"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"prompt": "hello", "max_tokens": 1}'
