"""`mmfm serve`: one process serving a Gradio web app and an OpenAI-compatible HTTP API over any mmfm model.

Requests reach the model through one worker (`mmfm.serve.engine.Engine`), which batches the chat requests that
arrive together; the web app and the API are thin layers over it.
"""
