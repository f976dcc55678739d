package connbudget.sandbox;

import java.time.ZoneOffset;
import java.time.ZonedDateTime;
import java.time.format.DateTimeFormatter;
import java.util.LinkedHashMap;
import java.util.Map;

/** One JSON log line per event, as the Python apps print them (time and event first). */
final class Json {
  private static final DateTimeFormatter TIME =
      DateTimeFormatter.ofPattern("yyyy-MM-dd'T'HH:mm:ss.SSSxxx");

  private Json() {}

  static void log(String event, Map<String, Object> fields) {
    Map<String, Object> line = new LinkedHashMap<>();
    line.put("time", ZonedDateTime.now(ZoneOffset.UTC).format(TIME));
    line.put("event", event);
    line.putAll(fields);
    String text = object(line) + "\n";
    synchronized (System.out) {
      System.out.print(text);
      System.out.flush();
    }
  }

  static String object(Map<String, Object> fields) {
    StringBuilder out = new StringBuilder("{");
    for (Map.Entry<String, Object> field : fields.entrySet()) {
      if (out.length() > 1) {
        out.append(',');
      }
      string(out, field.getKey());
      out.append(':');
      Object value = field.getValue();
      if (value instanceof Number || value instanceof Boolean) {
        out.append(value);
      } else {
        string(out, String.valueOf(value));
      }
    }
    return out.append('}').toString();
  }

  private static void string(StringBuilder out, String text) {
    out.append('"');
    for (int i = 0; i < text.length(); i++) {
      char c = text.charAt(i);
      switch (c) {
        case '"' -> out.append("\\\"");
        case '\\' -> out.append("\\\\");
        case '\n' -> out.append("\\n");
        case '\r' -> out.append("\\r");
        case '\t' -> out.append("\\t");
        default -> {
          if (c < 0x20) {
            out.append(String.format("\\u%04x", (int) c));
          } else {
            out.append(c);
          }
        }
      }
    }
    out.append('"');
  }
}
