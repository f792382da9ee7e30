def main(argv=None):
    raise SystemExit("not built yet")
