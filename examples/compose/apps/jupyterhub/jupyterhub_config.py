# JupyterHub's state lives in the lab's PostgreSQL; compose passes the URL built from the
# credentials pgprov wrote.
import os

c = get_config()  # noqa: F821 (provided by JupyterHub)
c.JupyterHub.db_url = os.environ["JUPYTERHUB_DB_URL"]
c.JupyterHub.bind_url = "http://0.0.0.0:8000"
