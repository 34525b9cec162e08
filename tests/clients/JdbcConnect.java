// Connect to idgate with pgjdbc (Debian's libpostgresql-jdbc-java), sending the access token as
// the password, run one query and print the rows as tab-separated lines (NULL as "\N").
//
// Run as a single-file program (Java 11+):
//   java -cp "$IDGATE_PGJDBC_JAR" tests/clients/JdbcConnect.java <jdbc-url> <user> <token-file> <query>
// e.g. jdbc:postgresql://127.0.0.1:5439/dev?sslmode=verify-full&sslrootcert=/path/ca.pem
//
// The token is read from <token-file>, never from argv, so it does not show in `ps`.
// Exit codes: 0 success, 1 connection or query error (message on stderr, token redacted),
// 2 bad arguments.

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;

public class JdbcConnect {
    public static void main(String[] args) {
        System.exit(run(args));
    }

    static int run(String[] args) {
        if (args.length != 4) {
            System.err.println(
                    "usage: java -cp postgresql.jar JdbcConnect.java <jdbc-url> <user> <token-file> <query>");
            return 2;
        }
        String url = args[0];
        String user = args[1];
        String token;
        try {
            token = Files.readString(Path.of(args[2]), StandardCharsets.UTF_8).strip();
        } catch (Exception e) {
            System.err.println("JdbcConnect: cannot read token file " + args[2] + ": " + e);
            return 2;
        }
        if (token.isEmpty()) {
            System.err.println("JdbcConnect: token file " + args[2] + " is empty");
            return 2;
        }
        String query = args[3];

        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", token);
        props.setProperty("connectTimeout", "30");
        props.setProperty("socketTimeout", "60");

        try (Connection conn = DriverManager.getConnection(url, props);
                Statement st = conn.createStatement()) {
            boolean hasRows = st.execute(query);
            if (hasRows) {
                try (ResultSet rs = st.getResultSet()) {
                    ResultSetMetaData md = rs.getMetaData();
                    int n = md.getColumnCount();
                    StringBuilder out = new StringBuilder();
                    while (rs.next()) {
                        for (int i = 1; i <= n; i++) {
                            if (i > 1) {
                                out.append('\t');
                            }
                            String v = rs.getString(i);
                            out.append(v == null ? "\\N" : v);
                        }
                        out.append('\n');
                    }
                    System.out.print(out);
                    System.out.flush();
                }
            }
            return 0;
        } catch (SQLException e) {
            StringBuilder msg = new StringBuilder("JdbcConnect: ");
            msg.append(e.getMessage());
            if (e.getSQLState() != null) {
                msg.append(" (SQLSTATE ").append(e.getSQLState()).append(')');
            }
            Throwable cause = e.getCause();
            if (cause != null) {
                msg.append("; caused by ").append(cause);
            }
            System.err.println(msg.toString().replace(token, "<redacted token>"));
            return 1;
        } catch (RuntimeException e) {
            System.err.println(("JdbcConnect: " + e).replace(token, "<redacted token>"));
            return 1;
        }
    }
}
