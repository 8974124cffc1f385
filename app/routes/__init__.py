"""Thin routes: parse, admit, hand off to `app.streaming`."""
