"""The `querydet` commands: thin Typer functions that parse options and call the rooms below
(shared.py holds the app and the choice lists they share)."""
