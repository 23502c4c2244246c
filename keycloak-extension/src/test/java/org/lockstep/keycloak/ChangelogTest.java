package org.lockstep.keycloak;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;

import java.io.InputStream;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import javax.xml.parsers.DocumentBuilderFactory;

import org.junit.jupiter.api.Test;
import org.w3c.dom.Element;
import org.w3c.dom.NodeList;

class ChangelogTest {

    /** The table the PostgreSQL tests create is the changelog's, column for column. */
    @Test
    void testTableMatchesTheChangelog() throws Exception {
        List<String> changelog = new ArrayList<>();
        try (InputStream in = getClass().getClassLoader().getResourceAsStream(LockstepJpaEntityProvider.CHANGELOG)) {
            assertNotNull(in, "changelog on the classpath");
            NodeList columns = DocumentBuilderFactory.newInstance().newDocumentBuilder().parse(in)
                    .getElementsByTagName("column");
            for (int i = 0; i < columns.getLength(); i++) {
                Element c = (Element) columns.item(i);
                if (c.getParentNode().getNodeName().equals("createTable")) {
                    changelog.add(c.getAttribute("name") + " " + c.getAttribute("type"));
                }
            }
        }
        List<String> ddl = new ArrayList<>();
        Matcher m = Pattern.compile("([A-Z_]+) (VARCHAR\\(\\d+\\)|BIGINT|INT)").matcher(
                Pg.DDL.substring(Pg.DDL.indexOf('(') + 1));
        while (m.find()) {
            ddl.add(m.group(1) + " " + m.group(2));
        }
        assertEquals(changelog, ddl);
    }
}
