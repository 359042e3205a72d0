package hoptrace.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.sql.SQLException;
import java.time.Duration;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRebalanceListener;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.WakeupException;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.StringDeserializer;

/**
 * A session consumer written the way a Java team would, with no OpenTelemetry code: it stands in
 * for hoptrace's reference session-worker so hoptrace can be tested on the spans the
 * OpenTelemetry Java agent makes of plain kafka-clients and JDBC.
 *
 * <p>Per record of CONSUME_TOPIC (group GROUP, manual commits, earliest offset): parse hoptrace's
 * envelope (a TRAINER_ALLOCATED v1), write the session and the processed mark in one transaction
 * ({@link SessionStore}), then commit the record's offset. A record that is not such an envelope
 * is logged and committed (skipped).
 *
 * <p>A failed write (FAULT=fail-db-write) is rolled back, the partition is sought back to the
 * record and retried after a one-second pause, for ever: the process keeps running, the record
 * blocks its partition, and every attempt leaves a failed JDBC span. max.poll.records is 1 so a
 * failure never abandons the agent's record iterator half-way (the agent ends a record's process
 * span when the loop asks for the next one).
 *
 * <p>Prints READY on stdout once partitions of CONSUME_TOPIC are assigned; on SIGTERM wakes the
 * consumer, closes it and exits (the agent flushes its spans in its own shutdown hook).
 */
public final class SessionConsumer {

  static final String CONSUMES = "TRAINER_ALLOCATED";
  static final String CORRELATION_HEADER = "x-correlation-id";
  private static final Duration POLL = Duration.ofMillis(500);
  private static final long RETRY_PAUSE_MS = 1000;

  private final Config config;
  private final ObjectMapper json = new ObjectMapper();
  private final CountDownLatch stop = new CountDownLatch(1);

  private SessionConsumer(Config config) {
    this.config = config;
  }

  public static void main(String[] args) throws Exception {
    Config config;
    try {
      config = Config.fromEnv(System.getenv());
    } catch (IllegalArgumentException e) {
      log(e.getMessage());
      System.exit(2);
      return;
    }
    new SessionConsumer(config).run();
  }

  private static void log(String line) {
    System.err.println("java-consumer: " + line);
  }

  private Properties kafkaProperties() {
    Properties p = new Properties();
    p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, config.bootstrap());
    p.put(ConsumerConfig.GROUP_ID_CONFIG, config.group());
    p.put(ConsumerConfig.CLIENT_ID_CONFIG, config.clientId());
    p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    p.put(ConsumerConfig.ALLOW_AUTO_CREATE_TOPICS_CONFIG, "false");
    p.put(ConsumerConfig.MAX_POLL_RECORDS_CONFIG, "1");
    p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
    p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    return p;
  }

  private void run() throws SQLException, InterruptedException {
    AtomicBoolean ready = new AtomicBoolean();
    Thread main = Thread.currentThread();
    try (SessionStore store = new SessionStore(config);
        KafkaConsumer<String, byte[]> consumer = new KafkaConsumer<>(kafkaProperties())) {
      store.ensureSchema();
      Runtime.getRuntime()
          .addShutdownHook(
              new Thread(
                  () -> {
                    log("stopping");
                    stop.countDown();
                    consumer.wakeup();
                    try {
                      main.join(15_000);
                    } catch (InterruptedException ignored) {
                      Thread.currentThread().interrupt();
                    }
                  },
                  "consumer-shutdown"));
      consumer.subscribe(
          List.of(config.topic()),
          new ConsumerRebalanceListener() {
            @Override
            public void onPartitionsAssigned(Collection<TopicPartition> partitions) {
              if (!partitions.isEmpty() && !ready.getAndSet(true)) {
                log("joined " + config.group() + " with " + partitions
                    + (config.failDbWrite() ? " (fault " + Config.FAIL_DB_WRITE + ")" : ""));
                System.out.println("READY");
                System.out.flush();
              }
            }

            @Override
            public void onPartitionsRevoked(Collection<TopicPartition> partitions) {}
          });
      try {
        while (stop.getCount() > 0) {
          ConsumerRecords<String, byte[]> records = consumer.poll(POLL);
          boolean failed = false;
          for (ConsumerRecord<String, byte[]> record : records) {
            TopicPartition tp = new TopicPartition(record.topic(), record.partition());
            if (process(store, record)) {
              consumer.commitSync(Map.of(tp, new OffsetAndMetadata(record.offset() + 1)));
            } else {
              consumer.seek(tp, record.offset());
              failed = true;
            }
          }
          if (failed) {
            stop.await(RETRY_PAUSE_MS, TimeUnit.MILLISECONDS);
          }
        }
      } catch (WakeupException e) {
        if (stop.getCount() > 0) {
          throw e;
        }
      }
    }
    log("stopped");
  }

  /** Handles one record; false when it failed and must be retried. */
  private boolean process(SessionStore store, ConsumerRecord<String, byte[]> record) {
    String where = record.topic() + "[" + record.partition() + "]@" + record.offset();
    SessionStore.Session session;
    try {
      session = parse(record);
    } catch (IOException | IllegalArgumentException e) {
      log("skipping " + where + ": " + e.getMessage());
      return true;
    }
    try {
      if (store.write(session) == SessionStore.Result.ALREADY_HANDLED) {
        log("skipping event " + session.eventId() + ": already handled");
      }
      return true;
    } catch (SQLException e) {
      log(where + " failed: " + e.getMessage().lines().findFirst().orElse(""));
      return false;
    }
  }

  private SessionStore.Session parse(ConsumerRecord<String, byte[]> record) throws IOException {
    if (record.value() == null) {
      throw new IllegalArgumentException("empty record value");
    }
    JsonNode env = json.readTree(record.value());
    if (env == null || !env.isObject()) {
      throw new IllegalArgumentException("not a JSON object");
    }
    String type = text(env, "type");
    if (!CONSUMES.equals(type) || env.path("version").asInt() != 1) {
      throw new IllegalArgumentException(
          "expected " + CONSUMES + " v1, got " + type + " v" + env.path("version").asText());
    }
    JsonNode payload = env.path("payload");
    String paymentId = text(payload, "payment_id");
    String correlationId = env.path("correlation_id").asText("");
    if (correlationId.isEmpty()) {
      Header h = record.headers().lastHeader(CORRELATION_HEADER);
      correlationId = h == null ? paymentId : new String(h.value(), StandardCharsets.UTF_8);
    }
    return new SessionStore.Session(
        text(env, "event_id"),
        type,
        correlationId,
        paymentId,
        text(payload, "student"),
        text(payload, "course"),
        text(payload, "trainer"));
  }

  private static String text(JsonNode node, String field) {
    JsonNode v = node.get(field);
    if (v == null || !v.isTextual() || v.asText().isEmpty()) {
      throw new IllegalArgumentException(field + ": missing or not a string");
    }
    return v.asText();
  }
}
