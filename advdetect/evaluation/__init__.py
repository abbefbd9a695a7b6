"""``advdetect evaluate``: the security evaluation harness and its reports."""
