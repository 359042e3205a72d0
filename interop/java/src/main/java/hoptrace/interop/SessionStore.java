package hoptrace.interop;

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.time.LocalDate;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;

/**
 * The consumer's database work over plain JDBC: in ONE transaction, skip an event whose mark
 * exists in this consumer's own table {@code java_handled}, else insert the
 * {@code tutoring_sessions} row (ON CONFLICT DO NOTHING) and the mark. With FAULT=fail-db-write
 * the session insert names a column the table does not have, so it fails every time and nothing
 * is marked.
 */
final class SessionStore implements AutoCloseable {

  /** What became of one event. */
  enum Result {
    WRITTEN,
    ALREADY_HANDLED
  }

  /** The fields of a TRAINER_ALLOCATED event that make a session. */
  record Session(
      String eventId, String eventType, String correlationId, String paymentId, String student,
      String course, String trainer) {}

  private static final String ENSURE_MARKS =
      """
      CREATE TABLE IF NOT EXISTS java_handled (
          event_ref text PRIMARY KEY,
          event_kind text NOT NULL,
          payment text NOT NULL,
          worker text NOT NULL,
          at timestamptz NOT NULL DEFAULT now())""";
  private static final String SEEN = "SELECT 1 FROM java_handled WHERE event_ref = ?";
  private static final String MARK =
      "INSERT INTO java_handled (event_ref, event_kind, payment, worker) VALUES (?, ?, ?, ?)";
  private static final String INSERT_SESSION =
      "INSERT INTO tutoring_sessions (correlation_id, student, course, trainer, starts_at)"
          + " VALUES (?, ?, ?, ?, ?) ON CONFLICT (correlation_id) DO NOTHING";
  private static final String INSERT_SESSION_FAULTY =
      "INSERT INTO tutoring_sessions (correlation_id, student, course, trainer, starts_at,"
          + " no_such_column) VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (correlation_id) DO NOTHING";

  private final Config config;
  private Connection conn;

  SessionStore(Config config) {
    this.config = config;
  }

  /** Creates the processed-mark table when it is missing. */
  void ensureSchema() throws SQLException {
    try (Statement st = connection().createStatement()) {
      st.execute(ENSURE_MARKS);
    }
    conn.commit();
  }

  Result write(Session s) throws SQLException {
    Connection c = connection();
    try {
      try (PreparedStatement seen = c.prepareStatement(SEEN)) {
        seen.setString(1, s.eventId());
        try (ResultSet rs = seen.executeQuery()) {
          if (rs.next()) {
            c.rollback();
            return Result.ALREADY_HANDLED;
          }
        }
      }
      try (PreparedStatement insert =
          c.prepareStatement(config.failDbWrite() ? INSERT_SESSION_FAULTY : INSERT_SESSION)) {
        insert.setString(1, s.correlationId());
        insert.setString(2, s.student());
        insert.setString(3, s.course());
        insert.setString(4, s.trainer());
        insert.setObject(5, firstSessionTime());
        insert.executeUpdate();
      }
      try (PreparedStatement mark = c.prepareStatement(MARK)) {
        mark.setString(1, s.eventId());
        mark.setString(2, s.eventType());
        mark.setString(3, s.paymentId());
        mark.setString(4, config.step());
        mark.executeUpdate();
      }
      c.commit();
      return Result.WRITTEN;
    } catch (SQLException e) {
      try {
        c.rollback();
      } catch (SQLException ignored) {
        closeQuietly();
      }
      throw e;
    }
  }

  /** Next day, 09:00 UTC (what the reference session-worker books). */
  static OffsetDateTime firstSessionTime() {
    return LocalDate.now(ZoneOffset.UTC).plusDays(1).atTime(9, 0).atOffset(ZoneOffset.UTC);
  }

  private Connection connection() throws SQLException {
    if (conn == null || conn.isClosed()) {
      conn = DriverManager.getConnection(config.jdbcUrl(), config.dbUser(), config.dbPassword());
      conn.setAutoCommit(false);
    }
    return conn;
  }

  private void closeQuietly() {
    try {
      if (conn != null) {
        conn.close();
      }
    } catch (SQLException ignored) {
      // the next write reconnects
    }
    conn = null;
  }

  @Override
  public void close() {
    closeQuietly();
  }
}
