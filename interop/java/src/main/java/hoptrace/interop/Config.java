package hoptrace.interop;

import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.util.Map;

/**
 * The consumer's settings, from the environment: KAFKA_BOOTSTRAP, DATABASE_URL (a
 * postgresql://user:password@host:port/db URL, as hoptrace writes it, or a jdbc: URL),
 * CONSUME_TOPIC, GROUP, STEP (the handler name in the processed mark) and FAULT. Tracing is not
 * configured here: the OpenTelemetry Java agent reads its own OTEL_* variables.
 */
record Config(
    String bootstrap,
    String jdbcUrl,
    String dbUser,
    String dbPassword,
    String topic,
    String group,
    String step,
    String clientId,
    boolean failDbWrite) {

  static final String FAIL_DB_WRITE = "fail-db-write";

  static Config fromEnv(Map<String, String> env) {
    String fault = env.getOrDefault("FAULT", "");
    if (!fault.isEmpty() && !fault.equals(FAIL_DB_WRITE)) {
      throw new IllegalArgumentException("FAULT=" + fault + ": expected " + FAIL_DB_WRITE + " or nothing");
    }
    String[] db = jdbc(required(env, "DATABASE_URL"));
    return new Config(
        required(env, "KAFKA_BOOTSTRAP"),
        db[0],
        db[1],
        db[2],
        required(env, "CONSUME_TOPIC"),
        required(env, "GROUP"),
        env.getOrDefault("STEP", "session.created"),
        env.getOrDefault("OTEL_SERVICE_NAME", "java-session-worker"),
        fault.equals(FAIL_DB_WRITE));
  }

  private static String required(Map<String, String> env, String name) {
    String value = env.get(name);
    if (value == null || value.isEmpty()) {
      throw new IllegalArgumentException(name + " is not set");
    }
    return value;
  }

  /** {jdbc url, user, password} of a postgresql:// URL; a jdbc: URL is used as it is. */
  static String[] jdbc(String url) {
    if (url.startsWith("jdbc:")) {
      return new String[] {url, null, null};
    }
    URI uri = URI.create(url);
    String scheme = uri.getScheme();
    if (!"postgresql".equals(scheme) && !"postgres".equals(scheme)) {
      throw new IllegalArgumentException("DATABASE_URL: expected postgresql://..., got " + scheme);
    }
    String user = null;
    String password = null;
    String info = uri.getRawUserInfo();
    if (info != null) {
      int colon = info.indexOf(':');
      user = decode(colon < 0 ? info : info.substring(0, colon));
      password = colon < 0 ? null : decode(info.substring(colon + 1));
    }
    int port = uri.getPort() < 0 ? 5432 : uri.getPort();
    String query = uri.getRawQuery() == null ? "" : "?" + uri.getRawQuery();
    return new String[] {
      "jdbc:postgresql://" + uri.getHost() + ":" + port + uri.getRawPath() + query, user, password
    };
  }

  private static String decode(String s) {
    return URLDecoder.decode(s, StandardCharsets.UTF_8);
  }
}
