# The testing kit as a pytest plugin: gives tests the `stepline_engine`
# fixture. In your project this line goes in the root conftest.py.
pytest_plugins = ["stepline.testing"]
