"""Files the local stack ships with the package: Kafka's Maven POM (its jars) and its log4j2
configuration (read by :mod:`hoptrace.devstack_kafka`). Data only; a package so that the wheel
carries them (``[tool.setuptools.package-data]``)."""
