"""Files the local stack runs with: the Kafka broker's Maven pom and its log4j2 config."""
