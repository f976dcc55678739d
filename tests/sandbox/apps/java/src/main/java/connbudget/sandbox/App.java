package connbudget.sandbox;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.Executors;

/**
 * The sandbox's Java app: an HTTP server over HikariCP and the PostgreSQL JDBC driver, with the
 * API and the log lines of the Python pool app ({@code tests/sandbox/apps/pools.py}).
 *
 * <p>{@code JAVA_MODE}:
 *
 * <ul>
 *   <li>{@code hikari} (default): a HikariCP pool of {@code HIKARI_MAXIMUM_POOL_SIZE} connections
 *       (default 2), {@code HIKARI_MINIMUM_IDLE} of them (default: all) kept idle; with fewer, a
 *       burst opens connections that HikariCP closes after its default idleTimeout (10 min). No
 *       keepalive (keepaliveTime 0), no connectionTestQuery.
 *   <li>{@code leak}: no pool, and a leak: each request opens a connection with {@code
 *       DriverManager.getConnection} and never closes it (it stays referenced in a list, as one
 *       kept in a cache or a field does), so each request leaves one connection idle, never used
 *       again.
 * </ul>
 *
 * <p>HikariCP checks a connection idle for more than 500 ms before lending it ({@code
 * Connection.isValid}); this app turns that off ({@code PRE_PING=0}, the default: the system
 * property {@code com.zaxxer.hikari.aliveBypassWindowMs}), so a connection closed by the server
 * is found dead only by the next request that gets it. {@code PRE_PING=1} keeps the library's
 * default.
 *
 * <p>{@code GET /work?idle=S} runs a query, and with S &gt; 0 waits S seconds (at most 30)
 * holding the connection and runs a second; one JSON log line per request ({@code event}
 * request, {@code outcome}, {@code idle}, {@code ms}, {@code kind}, and for a failure the
 * exception's class and the matched phrase: {@link Outcomes}). {@code GET /healthz} answers 200.
 * It listens on {@code APP_PORT} (default 8000) with {@code APP_THREADS} threads (default 16),
 * connects to {@code DATABASE_URL} with {@code application_name} {@code PGAPPNAME}.
 */
public final class App {
  static final String QUERY_1 = "SELECT count(*) FROM pg_catalog.pg_class";
  static final String QUERY_2 = "SELECT count(*) FROM pg_catalog.pg_namespace";
  static final double MAX_IDLE = 30.0; // seconds

  /** Lends a connection for one request; closing it gives it back (or, leaking, does nothing). */
  interface Lender {
    Lent lend() throws SQLException;
  }

  interface Lent extends AutoCloseable {
    Connection connection();

    @Override
    void close() throws SQLException;
  }

  private final String kind;
  private final Lender lender;

  private App(String kind, Lender lender) {
    this.kind = kind;
    this.lender = lender;
  }

  static int envInt(String name, int fallback) {
    String text = System.getenv(name);
    if (text == null || text.isEmpty()) {
      return fallback;
    }
    try {
      return Integer.parseInt(text);
    } catch (NumberFormatException e) {
      System.err.println(name + " must be an integer, not '" + text + "'");
      System.exit(2);
      return fallback;
    }
  }

  /** What the JDBC driver needs from a {@code postgresql://user:password@host:port/db?...} URL. */
  record Target(String jdbcUrl, String user, String password) {
    static Target parse(String url) {
      URI uri = URI.create(url);
      String user = "";
      String password = "";
      String info = uri.getRawUserInfo();
      if (info != null) {
        int colon = info.indexOf(':');
        user = percentDecode(colon < 0 ? info : info.substring(0, colon));
        password = colon < 0 ? "" : percentDecode(info.substring(colon + 1));
      }
      String host = uri.getHost() == null ? "localhost" : uri.getHost();
      int port = uri.getPort() < 0 ? 5432 : uri.getPort();
      String path = uri.getRawPath() == null ? "/" : uri.getRawPath();
      String query = uri.getRawQuery() == null ? "" : "?" + uri.getRawQuery();
      return new Target("jdbc:postgresql://" + host + ":" + port + path + query, user, password);
    }

    /** {@code %xx} decoded; unlike URLDecoder, a {@code +} stays a plus. */
    static String percentDecode(String text) {
      ByteArrayOutputStream out = new ByteArrayOutputStream();
      for (int i = 0; i < text.length(); i++) {
        char c = text.charAt(i);
        if (c == '%' && i + 2 < text.length()) {
          out.write(Integer.parseInt(text.substring(i + 1, i + 3), 16));
          i += 2;
        } else {
          out.writeBytes(String.valueOf(c).getBytes(StandardCharsets.UTF_8));
        }
      }
      return out.toString(StandardCharsets.UTF_8);
    }
  }

  static Lender hikari(Target target, String appName, boolean prePing) {
    int maximum = envInt("HIKARI_MAXIMUM_POOL_SIZE", 2);
    int minimumIdle = envInt("HIKARI_MINIMUM_IDLE", maximum);
    if (!prePing) {
      // Read by each pool as it starts: the idle time past which a connection is checked with
      // isValid() before it is lent (HikariCP's default: 500 ms).
      System.setProperty("com.zaxxer.hikari.aliveBypassWindowMs", Long.toString(Long.MAX_VALUE));
    }
    HikariConfig config = new HikariConfig();
    config.setJdbcUrl(target.jdbcUrl());
    config.setUsername(target.user());
    config.setPassword(target.password());
    config.addDataSourceProperty("ApplicationName", appName);
    config.setPoolName(appName);
    config.setMaximumPoolSize(maximum);
    config.setMinimumIdle(minimumIdle);
    config.setKeepaliveTime(0);
    HikariDataSource pool = new HikariDataSource(config);
    return () -> {
      Connection conn = pool.getConnection();
      return new Lent() {
        @Override
        public Connection connection() {
          return conn;
        }

        @Override
        public void close() throws SQLException {
          conn.close(); // back to the pool
        }
      };
    };
  }

  static Lender leaking(Target target, String appName) {
    List<Connection> leaked = new ArrayList<>();
    Properties props = new Properties();
    props.setProperty("user", target.user());
    props.setProperty("password", target.password());
    props.setProperty("ApplicationName", appName);
    return () -> {
      Connection conn = DriverManager.getConnection(target.jdbcUrl(), props);
      // The leak: kept, never closed, never lent again.
      synchronized (leaked) {
        leaked.add(conn);
      }
      return new Lent() {
        @Override
        public Connection connection() {
          return conn;
        }

        @Override
        public void close() {}
      };
    };
  }

  static void execute(Connection conn, String sql) throws SQLException {
    try (Statement st = conn.createStatement();
        ResultSet rs = st.executeQuery(sql)) {
      while (rs.next()) {
        rs.getLong(1);
      }
    }
  }

  void work(HttpExchange exchange) throws IOException {
    double idle = 0.0;
    String query = exchange.getRequestURI().getRawQuery();
    if (query != null) {
      for (String pair : query.split("&")) {
        if (pair.startsWith("idle=")) {
          try {
            idle = Double.parseDouble(pair.substring(5));
          } catch (NumberFormatException e) {
            idle = 0.0;
          }
        }
      }
    }
    idle = Double.isNaN(idle) ? 0.0 : Math.min(MAX_IDLE, Math.max(0.0, idle));
    long started = System.nanoTime();
    boolean inFlight = false;
    String outcome = "ok";
    Map<String, Object> fields = new LinkedHashMap<>();
    try (Lent lent = lender.lend()) {
      execute(lent.connection(), QUERY_1);
      inFlight = true;
      if (idle > 0) {
        Thread.sleep((long) (idle * 1000));
        execute(lent.connection(), QUERY_2);
      }
    } catch (Exception e) { // every error, classified by its messages
      String[] classified = Outcomes.classify(e, inFlight);
      outcome = classified[0];
      fields.put("error", e.getClass().getSimpleName());
      fields.put("reason", classified[1]);
      if (e instanceof InterruptedException) {
        Thread.currentThread().interrupt();
      }
    }
    long ms = Math.round((System.nanoTime() - started) / 1e6);
    Map<String, Object> line = new LinkedHashMap<>();
    line.put("outcome", outcome);
    line.put("idle", idle);
    line.put("ms", ms);
    line.put("kind", kind);
    line.putAll(fields);
    Json.log("request", line);
    Map<String, Object> body = new LinkedHashMap<>();
    body.put("outcome", outcome);
    body.putAll(fields);
    reply(exchange, outcome.equals("ok") ? 200 : 503, Json.object(body));
  }

  static void reply(HttpExchange exchange, int status, String body) throws IOException {
    byte[] data = body.getBytes(StandardCharsets.UTF_8);
    exchange.getResponseHeaders().set("Content-Type", "application/json");
    exchange.sendResponseHeaders(status, data.length);
    try (OutputStream out = exchange.getResponseBody()) {
      out.write(data);
    }
  }

  public static void main(String[] args) throws IOException {
    String kind = System.getenv().getOrDefault("JAVA_MODE", "hikari");
    String appName = System.getenv().getOrDefault("PGAPPNAME", "java-hikari-app");
    String url = System.getenv("DATABASE_URL");
    if (url == null || url.isEmpty()) {
      System.err.println("DATABASE_URL is not set: give the pod the DSN to connect to");
      System.exit(2);
    }
    boolean prePing = "1".equals(System.getenv("PRE_PING"));
    int port = envInt("APP_PORT", 8000);
    Target target = Target.parse(url);
    Lender lender;
    int size;
    switch (kind) {
      case "hikari" -> {
        lender = hikari(target, appName, prePing);
        size = envInt("HIKARI_MAXIMUM_POOL_SIZE", 2);
      }
      case "leak" -> {
        lender = leaking(target, appName);
        size = 0;
      }
      default -> {
        System.err.println("JAVA_MODE must be hikari or leak, not '" + kind + "'");
        System.exit(2);
        return;
      }
    }
    App app = new App(kind, lender);
    HttpServer server = HttpServer.create(new InetSocketAddress(port), 64);
    server.createContext(
        "/",
        exchange -> {
          try (exchange) {
            String path = exchange.getRequestURI().getPath();
            if (path.equals("/work")) {
              app.work(exchange);
            } else if (path.equals("/healthz")) {
              reply(exchange, 200, "{\"ok\":true}");
            } else {
              reply(exchange, 404, "{\"error\":\"not found\"}");
            }
          }
        });
    server.setExecutor(Executors.newFixedThreadPool(envInt("APP_THREADS", 16)));
    Runtime.getRuntime().addShutdownHook(new Thread(() -> server.stop(1)));
    server.start();
    Map<String, Object> ready = new LinkedHashMap<>();
    ready.put("kind", kind);
    ready.put("size", size);
    ready.put("pre_ping", prePing);
    ready.put("pid", ProcessHandle.current().pid());
    Json.log("pool_ready", ready);
  }
}
