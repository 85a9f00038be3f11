"""The bundled sample model and scene, installed as `querydet_cli.sample_data`."""
