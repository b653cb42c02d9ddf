"""secrets.read_secret: the one loader of every secret, and every option and
backend URL parameter that uses it refusing an empty secret."""

import os
import tempfile

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import tap
from cloudfoxy_proxy.secrets import read_secret

ENV_VARS = ("FOXYPROXY_CLIENT_PASSWORD", "FOXYPROXY_REST_TOKEN", "FOXYPROXY_TOKEN", "FOXYPROXY_PASSWORD")


class SecretFiles(SynchronousTestCase):
    def setUp(self):
        saved = {k: os.environ.pop(k) for k in ENV_VARS if k in os.environ}
        self.addCleanup(os.environ.update, saved)
        for k in ENV_VARS:
            self.addCleanup(os.environ.pop, k, None)

    def file(self, text):
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.remove, path)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path


class ReadSecretTests(SecretFiles):
    def test_first_line_without_white_space(self):
        self.assertEqual(read_secret("--x-file", self.file("  s3cret \r\nsecond line\n")), "s3cret")

    def test_environment_when_no_file(self):
        env = {"SECRET": " tok "}
        self.assertEqual(read_secret("--x-file", None, "SECRET", env), "tok")
        self.assertIsNone(read_secret("--x-file", None, "SECRET", {}))
        self.assertEqual(read_secret("--x-file", self.file("from-file\n"), "SECRET", env), "from-file")

    def test_empty_values_are_errors_naming_the_source(self):
        for text in ("", "\n", "   \n", "\t\r\nsecret on line 2\n"):
            e = self.assertRaises(ValueError, read_secret, "--x-file", self.file(text))
            self.assertIn("--x-file", str(e))
            self.assertIn("empty", str(e))
        e = self.assertRaises(ValueError, read_secret, "token_file", self.file(" \n"))
        self.assertTrue(str(e).startswith("token_file= "), str(e))
        for value in ("", "  ", "\n"):
            e = self.assertRaises(ValueError, read_secret, "--x-file", None, "SECRET", {"SECRET": value})
            self.assertIn("env SECRET is set but empty", str(e))
            self.assertIn("--x-file", str(e))

    def test_unreadable_file_and_no_file_name(self):
        e = self.assertRaises(ValueError, read_secret, "--x-file", "/nonexistent/secret")
        self.assertEqual(str(e), "--x-file '/nonexistent/secret': No such file or directory")
        e = self.assertRaises(ValueError, read_secret, "password_file", "")
        self.assertEqual(str(e), "password_file=: no file name given")


class EverySourceTests(SecretFiles):
    """Each secret option, URL parameter and environment variable stops
    start-up on an empty value with one message naming it."""

    def refused(self, *args):
        o = tap.Options()
        return str(self.assertRaises(usage.UsageError, o.parseOptions, list(args)))

    def test_empty_files(self):
        for empty in (self.file(""), self.file(" \n")):
            for args, name in [
                (["--client-password-file", empty], "--client-password-file"),
                (["--rest", "tcp:0", "--rest-token-file", empty], "--rest-token-file"),
                (["--token-file", empty], "--token-file"),
                (["--password-file", empty], "--password-file"),
                (["--backend", f"cloudfoxy+http://127.0.0.1:1?token_file={empty}"], "token_file="),
                (["--backend", f"tcp://127.0.0.1:1?password_file={empty}"], "password_file="),
                (["--backend", f"tls://127.0.0.1:1?password_file={empty}"], "password_file="),
            ]:
                message = self.refused(*args)
                self.assertIn(name, message, args)
                self.assertIn("empty", message, args)

    def test_empty_environment_variables(self):
        for var, args in [
            ("FOXYPROXY_CLIENT_PASSWORD", []),
            ("FOXYPROXY_REST_TOKEN", ["--rest", "tcp:0"]),
            ("FOXYPROXY_TOKEN", []),
            ("FOXYPROXY_PASSWORD", []),
        ]:
            os.environ[var] = "  "
            try:
                self.assertIn(f"env {var} is set but empty", self.refused(*args))
            finally:
                del os.environ[var]

    def test_good_secrets_reach_their_users(self):
        o = tap.Options()
        os.environ["FOXYPROXY_TOKEN"] = "env-token"
        o.parseOptions(["--client-password-file", self.file("pw\n"), "--password-file", self.file("up\n"),
                        "--rest", "tcp:0", "--rest-token-file", self.file("rt\n"),
                        "--backend", f"cloudfoxy+http://127.0.0.1:1?token_file={self.file('url-token')}"])
        self.assertEqual((o["client-password"], o["password"], o["rest-token"], o["token"]),
                         ("pw", "up", "rt", "env-token"))
