import base64


def test_readers_and_apdu(proxy):
    with proxy.client() as c:
        names = c.results(">*|\n>1:READERS|\n\n")[0].split("|")
        assert [base64.b64decode(n).decode() for n in names] == [
            "Emulated 00", "Emulated 01", "Emulated 02", "Emulated 03"]
        assert c.request(">Emulated 01|\n>7:APDU:00A4000C023F00|\n") == [("7", "9000")]
