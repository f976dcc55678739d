// Command goapp is the sandbox's Go app: an HTTP server over pgx v5 with the API and the log
// lines of the Python pool app (tests/sandbox/apps/pools.py).
//
// GO_MODE picks how it holds its connections:
//
//   - pgxpool (default): a pgxpool.Pool of PGX_MAX_CONNS connections (default 2), PGX_MIN_CONNS
//     of them (default: all) opened at start and kept; its health check runs once an hour, so
//     it closes nothing on its own while the app runs;
//   - sql: database/sql over pgx's stdlib driver, SQL_MAX_OPEN_CONNS connections at most
//     (default 2), of which SQL_MAX_IDLE_CONNS (default: all) are kept idle between requests:
//     with fewer idle than open, a burst opens connections that are closed when returned, and
//     the spare idle ones wait for the next request;
//   - leak: no pool, and a leak: each request opens a connection with pgx.Connect and never
//     closes it (it stays referenced, as one kept in a cache or a global does), so each request
//     leaves one connection idle, never used again.
//
// Neither pool checks a connection before lending it (PRE_PING=0, the default): pgx pings a
// connection idle for more than a second before lending it, unless told not to, as this app
// does; PRE_PING=1 keeps the library's default. A connection closed by the server is found
// dead only by the next request that gets it.
//
// GET /work?idle=S runs a query, and with S > 0 waits S seconds (at most 30) holding the
// connection and runs a second. One JSON log line per request (event "request", outcome,
// idle, ms, kind, and for a failure the error's type and the matched phrase: see outcome.go).
// GET /healthz answers 200. It listens on APP_PORT (default 8000), connects to DATABASE_URL
// with application_name PGAPPNAME.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
)

const (
	query1  = "SELECT count(*) FROM pg_catalog.pg_class"
	query2  = "SELECT count(*) FROM pg_catalog.pg_namespace"
	maxIdle = 30 * time.Second
	// A request's own deadline: longer than the longest idle pause plus two queries.
	requestTimeout = 45 * time.Second
	// The pool's health check closes connections idle past MaxConnIdleTime or past their
	// lifetime; once an hour, it leaves the pool alone for as long as a test runs.
	healthCheckPeriod = time.Hour
)

// execute runs one statement on the connection a request holds.
type execute func(ctx context.Context, sql string) error

// lender lends a connection for the length of one request; release gives it back.
type lender func(ctx context.Context) (run execute, release func(), err error)

// logLine prints one JSON line: time and event first, then fields in the order given.
func logLine(event string, fields ...any) {
	buf := []byte(`{"time":`)
	buf, _ = appendJSON(buf, time.Now().UTC().Format("2006-01-02T15:04:05.000-07:00"))
	buf = append(buf, `,"event":`...)
	buf, _ = appendJSON(buf, event)
	for i := 0; i+1 < len(fields); i += 2 {
		buf = append(buf, ',')
		buf, _ = appendJSON(buf, fields[i])
		buf = append(buf, ':')
		buf, _ = appendJSON(buf, fields[i+1])
	}
	buf = append(buf, '}', '\n')
	os.Stdout.Write(buf)
}

func appendJSON(buf []byte, v any) ([]byte, error) {
	data, err := json.Marshal(v)
	if err != nil {
		data = []byte(`null`)
	}
	return append(buf, data...), err
}

func envInt(name string, fallback int) int {
	text := os.Getenv(name)
	if text == "" {
		return fallback
	}
	n, err := strconv.Atoi(text)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s must be an integer, not %q\n", name, text)
		os.Exit(2)
	}
	return n
}

func connConfig(appName string) *pgx.ConnConfig {
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		fmt.Fprintln(os.Stderr, "DATABASE_URL is not set: give the pod the DSN to connect to")
		os.Exit(2)
	}
	config, err := pgx.ParseConfig(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "DATABASE_URL is not a valid connection string")
		os.Exit(2)
	}
	config.RuntimeParams["application_name"] = appName
	return config
}

func scanOne(row interface{ Scan(...any) error }) error {
	var n int64
	return row.Scan(&n)
}

func pgxPool(ctx context.Context, config *pgx.ConnConfig, prePing bool) (lender, int) {
	maxConns := envInt("PGX_MAX_CONNS", 2)
	minConns := envInt("PGX_MIN_CONNS", maxConns)
	poolConfig, err := pgxpool.ParseConfig("")
	if err != nil {
		panic(err)
	}
	poolConfig.ConnConfig = config
	poolConfig.MaxConns = int32(maxConns)
	poolConfig.MinConns = int32(minConns)
	poolConfig.HealthCheckPeriod = healthCheckPeriod
	if !prePing {
		// pgxpool pings a connection idle for more than a second before lending it.
		poolConfig.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return false }
	}
	pool, err := pgxpool.NewWithConfig(ctx, poolConfig)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgxpool: invalid configuration")
		os.Exit(2)
	}
	return func(ctx context.Context) (execute, func(), error) {
		conn, err := pool.Acquire(ctx)
		if err != nil {
			return nil, nil, err
		}
		run := func(ctx context.Context, sql string) error { return scanOne(conn.QueryRow(ctx, sql)) }
		return run, conn.Release, nil
	}, maxConns
}

func sqlPool(config *pgx.ConnConfig, prePing bool) (lender, int) {
	maxOpen := envInt("SQL_MAX_OPEN_CONNS", 2)
	maxIdle := envInt("SQL_MAX_IDLE_CONNS", maxOpen)
	var options []stdlib.OptionOpenDB
	if !prePing {
		// pgx's stdlib driver pings a connection idle for more than a second when it is reused.
		options = append(options, stdlib.OptionShouldPing(
			func(context.Context, stdlib.ShouldPingParams) bool { return false },
		))
	}
	db := stdlib.OpenDB(*config, options...)
	db.SetMaxOpenConns(maxOpen)
	db.SetMaxIdleConns(maxIdle)
	return func(ctx context.Context) (execute, func(), error) {
		conn, err := db.Conn(ctx)
		if err != nil {
			return nil, nil, err
		}
		run := func(ctx context.Context, sql string) error {
			return scanOne(conn.QueryRowContext(ctx, sql))
		}
		return run, func() { _ = conn.Close() }, nil
	}, maxOpen
}

func leakingConnections(config *pgx.ConnConfig) (lender, int) {
	var mu sync.Mutex
	var leaked []*pgx.Conn
	return func(ctx context.Context) (execute, func(), error) {
		conn, err := pgx.ConnectConfig(ctx, config.Copy())
		if err != nil {
			return nil, nil, err
		}
		// The leak: kept, never closed, never lent again.
		mu.Lock()
		leaked = append(leaked, conn)
		mu.Unlock()
		run := func(ctx context.Context, sql string) error { return scanOne(conn.QueryRow(ctx, sql)) }
		return run, func() {}, nil
	}, 0
}

// errorType names an error's Go type, without its pointer star ("pgconn.PgError").
func errorType(err error) string {
	var pgErr interface{ SQLState() string }
	if errors.As(err, &pgErr) {
		err = pgErr.(error)
	}
	name := fmt.Sprintf("%T", err)
	if len(name) > 0 && name[0] == '*' {
		name = name[1:]
	}
	return name
}

type app struct {
	kind string
	lend lender
}

func (a *app) work(w http.ResponseWriter, r *http.Request) {
	idle, err := strconv.ParseFloat(r.URL.Query().Get("idle"), 64)
	if err != nil || idle < 0 || idle != idle {
		idle = 0
	}
	pause := min(time.Duration(idle*float64(time.Second)), maxIdle)
	idle = pause.Seconds()
	started := time.Now()
	ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
	defer cancel()

	inFlight := false
	err = func() error {
		run, release, err := a.lend(ctx)
		if err != nil {
			return err
		}
		defer release()
		if err := run(ctx, query1); err != nil {
			return err
		}
		inFlight = true
		if pause > 0 {
			time.Sleep(pause)
			return run(ctx, query2)
		}
		return nil
	}()

	outcome := "ok"
	reply := map[string]any{}
	fields := []any{}
	if err != nil {
		var reason string
		outcome, reason = classify(err, inFlight)
		reply["error"], reply["reason"] = errorType(err), reason
		fields = append(fields, "error", errorType(err), "reason", reason)
	}
	reply["outcome"] = outcome
	ms := time.Since(started).Milliseconds()
	logLine("request", append([]any{"outcome", outcome, "idle", idle, "ms", ms, "kind", a.kind}, fields...)...)
	w.Header().Set("Content-Type", "application/json")
	if outcome != "ok" {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(reply)
}

func main() {
	kind := os.Getenv("GO_MODE")
	if kind == "" {
		kind = "pgxpool"
	}
	appName := os.Getenv("PGAPPNAME")
	if appName == "" {
		appName = "go-pg-app"
	}
	prePing := os.Getenv("PRE_PING") == "1"
	port := os.Getenv("APP_PORT")
	if port == "" {
		port = "8000"
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	config := connConfig(appName)
	var lend lender
	var size int
	switch kind {
	case "pgxpool":
		lend, size = pgxPool(ctx, config, prePing)
	case "sql":
		lend, size = sqlPool(config, prePing)
	case "leak":
		lend, size = leakingConnections(config)
	default:
		fmt.Fprintf(os.Stderr, "GO_MODE must be pgxpool, sql or leak, not %q\n", kind)
		os.Exit(2)
	}
	a := &app{kind: kind, lend: lend}
	mux := http.NewServeMux()
	mux.HandleFunc("/work", a.work)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"ok":true}` + "\n"))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"error":"not found"}` + "\n"))
	})
	server := &http.Server{Addr: ":" + port, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_ = server.Shutdown(shutdown)
	}()
	logLine("pool_ready", "kind", kind, "size", size, "pre_ping", prePing, "pid", os.Getpid())
	if err := server.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	logLine("stopped")
}
