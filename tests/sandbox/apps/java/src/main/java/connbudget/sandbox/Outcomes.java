package connbudget.sandbox;

import java.util.List;
import java.util.Locale;

/**
 * A failed request's outcome, as {@code tests/sandbox/workloads/outcomes.py} classifies it: the
 * same phrases (a unit test keeps them in step), then how the JDBC driver says that the server
 * closed the connection. Only the matched phrase is logged, never a message (it could name the
 * server or the statement).
 */
final class Outcomes {
  static final List<String> REFUSED_PHRASES =
      List.of(
          "too many clients",
          "remaining connection slots are reserved",
          "connection slots are reserved",
          "no more connections allowed");

  static final List<String> TERMINATED_PHRASES =
      List.of(
          "terminating connection due to administrator command",
          "terminating connection due to idle-session timeout",
          "terminating connection due to idle-in-transaction timeout",
          "server closed the connection unexpectedly",
          "consuming input failed",
          "connection already closed",
          "the connection is closed",
          "the connection is lost",
          "could not receive data from server",
          "could not send data to server",
          "connection was closed in the middle of operation",
          "ssl syscall error: eof detected",
          // pgjdbc and java.net: the connection was closed under the client.
          "an i/o error occurred while sending to the backend",
          "this connection has been closed",
          "connection reset",
          "broken pipe");

  private Outcomes() {}

  /**
   * {@code {outcome, reason}} for an exception and those it was raised from (HikariCP wraps the
   * driver's): {@code refused} for a connection the server would not open, {@code terminated}
   * when the request's first query found its connection dead, {@code inflight_broken} when it
   * died between two queries of the request ({@code inFlight}), {@code error} for anything else.
   */
  static String[] classify(Throwable error, boolean inFlight) {
    StringBuilder text = new StringBuilder();
    Throwable e = error;
    for (int depth = 0; e != null && depth < 5; depth++, e = e.getCause()) {
      text.append(String.valueOf(e.getMessage()).toLowerCase(Locale.ROOT)).append('\n');
    }
    String message = text.toString();
    for (String phrase : REFUSED_PHRASES) {
      if (message.contains(phrase)) {
        return new String[] {"refused", phrase};
      }
    }
    for (String phrase : TERMINATED_PHRASES) {
      if (message.contains(phrase)) {
        return new String[] {inFlight ? "inflight_broken" : "terminated", phrase};
      }
    }
    return new String[] {"error", ""};
  }
}
