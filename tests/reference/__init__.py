"""Independent re-statements of upstream code, used only as oracles by the tests."""
